//! Placeholder: filled by the aggregator/protocol work.
