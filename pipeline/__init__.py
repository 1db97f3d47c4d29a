"""Task orchestration: the loops behind the command lines (export, adaptation, training), built on
models/, datasets/ and utils/. Each task module exposes `add_arguments(parser)` and `run(args)`."""
