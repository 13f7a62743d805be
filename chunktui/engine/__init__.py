"""The method, on torch: models, hooks, corpora, matching, fitting, perturbation. Imports torch and chunktui.shared; never the CLI, the app, the facade or the RNN lab."""
