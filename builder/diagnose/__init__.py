"""Where the time goes and what to change: in-process profiles of built variants (`profile`), advice
rules over those profiles and the served breakdown (`advice`), and resource use during `perf` (`usage`)."""
