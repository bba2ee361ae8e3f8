//! Integration tests of `ferrosync-rules`, as one test binary:
//! `legacy` holds hand-written end-to-end tests, `corpus` runs the
//! table-driven conformance corpus in `tests/corpus/*.yaml`.

mod corpus;
mod legacy;
