"""Suite-wide set-up."""

from __future__ import annotations

import signal

# A shell starts background jobs with SIGINT ignored, and a Python child then
# inherits the ignore and never raises KeyboardInterrupt. The Ctrl-C tests
# deliver SIGINT to `loralab` subprocesses, so give them the terminal's
# behaviour: with a Python handler here, an exec'd child starts at SIG_DFL.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
