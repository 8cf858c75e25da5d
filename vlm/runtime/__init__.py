"""Runtime plumbing around the design: the CLI, checkpoint and export IO, results, logging,
preemption, quiet output and the data links. Nothing here is a method or a tower; the design
files import from it only its errors and run-time checks."""
