"""The reflection-RNN lab (planted words, discrete sequence chunking, grafting, transfer): may import the engine and shared floors, never the facade, the CLI or the app."""
