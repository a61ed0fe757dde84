//! Ferry storage-writer service
