//! Object layout: chunks, index pages, manifests, catalog log, encryption
