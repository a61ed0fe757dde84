//! Ferry scheduler service
