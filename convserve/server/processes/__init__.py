"""Processes and cores: the supervisor of worker processes, one worker, the cores a process may use, the
listening sockets they share, and handing freed heap back to the OS."""
