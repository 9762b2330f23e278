//! Placeholder: filled by the API-double work.
