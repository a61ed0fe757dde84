//! Ferry operator CLI and `ferry up`
