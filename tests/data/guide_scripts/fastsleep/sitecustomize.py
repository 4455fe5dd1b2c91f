# Test aid: makes time.sleep 100x shorter so the guide's scripts (which sleep 1-2 s per
# step) finish quickly; the scripts themselves are unchanged.
import time as _t

_real = _t.sleep
_t.sleep = lambda s: _real(min(s, 1.0) / 100.0)
