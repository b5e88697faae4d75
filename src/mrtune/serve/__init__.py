"""`mrtune serve`: a finished run's model behind an HTTP API with dynamic batching, an OpenAI-compatible
interface, Prometheus metrics and a web page."""
