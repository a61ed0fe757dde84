//! Whole-mesh tests and their harness
