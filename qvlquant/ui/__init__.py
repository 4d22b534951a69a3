"""What the terminal shows: progress bars and one-line messages on stderr."""
