"""Old import paths of the QNN modules, kept while cli.py still names them: the runtime is now
backends/qnn_runtime.py, the build tools are convert/qnn_build.py, qnn_rewrite.py, qnn_slices.py."""
