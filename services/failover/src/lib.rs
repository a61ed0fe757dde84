//! Ferry failover service
