//! Redis: leases with fencing tokens, work and retry queues, a redis-server launcher
