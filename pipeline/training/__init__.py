"""Stage two: the student trained from the cache (data, schedule, engine, run with set-up and resume, live logging)."""
