//! Ferry registry service
