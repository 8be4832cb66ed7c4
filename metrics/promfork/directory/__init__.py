"""The shared multiprocess directory: its file names, file format, locks, and creating, checking and wiping it."""
