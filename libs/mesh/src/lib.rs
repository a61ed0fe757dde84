//! Server plumbing: config, tracing, TLS/PKI, health, reflection, auth, shutdown, error mapping
