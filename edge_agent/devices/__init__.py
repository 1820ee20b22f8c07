"""Vehicle devices on the board's serial lines: one sans-I/O codec and one thin async shell per protocol."""
