//! Ferry ingest service
