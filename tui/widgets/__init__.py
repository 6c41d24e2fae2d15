"""The app's widgets and modal screens, one to a file."""
