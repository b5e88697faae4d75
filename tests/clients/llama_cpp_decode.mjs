// Greedy decoding with llama.cpp through node-llama-cpp (an independent client of the exported files).
// usage: node llama_cpp_decode.mjs MODEL.gguf PROMPTS.jsonl OUT.jsonl [--grammar FILE] [--lora FILE]
//        [--threads N] [--max-tokens N]
// PROMPTS.jsonl rows: {"prompt": "..."}; OUT.jsonl rows: {"text", "prompt_tokens", "stop_reason", "seconds"}.
import fs from "node:fs";
import { getLlama, LlamaCompletion } from "node-llama-cpp";

const [modelPath, promptsPath, outPath, ...rest] = process.argv.slice(2);
const option = (name, fallback) => {
    const at = rest.indexOf(name);
    return at >= 0 ? rest[at + 1] : fallback;
};
const grammarPath = option("--grammar");
const loraPath = option("--lora");
const threads = Number(option("--threads", "2"));
const maxTokens = Number(option("--max-tokens", "160"));

// Prebuilt CPU binaries only: no GPU probing, never a build from source.
const llama = await getLlama({ gpu: false, build: "never", logLevel: "error" });
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
const context = await model.createContext({
    contextSize: 1024,
    threads,
    ...(loraPath ? { lora: { adapters: [{ filePath: loraPath }] } } : {}),
});
const completion = new LlamaCompletion({ contextSequence: context.getSequence() });
const grammar = grammarPath
    ? await llama.createGrammar({ grammar: fs.readFileSync(grammarPath, "utf8") })
    : undefined;

const rows = fs.readFileSync(promptsPath, "utf8").split("\n").filter((line) => line.trim()).map(JSON.parse);
const out = fs.openSync(outPath, "w");
for (const row of rows) {
    const started = process.hrtime.bigint();
    const result = await completion.generateCompletionWithMeta(row.prompt, {
        maxTokens,
        temperature: 0, // greedy
        repeatPenalty: false,
        grammar,
    });
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    fs.writeSync(out, JSON.stringify({
        text: result.response,
        prompt_tokens: model.tokenize(row.prompt),
        stop_reason: result.metadata.stopReason,
        seconds,
    }) + "\n");
}
fs.closeSync(out);
await context.dispose();
await model.dispose();
