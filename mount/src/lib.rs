//! The FUSE mount (placeholder until wired).
