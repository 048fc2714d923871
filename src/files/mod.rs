//! Files in, files kept.
//!
//! Inputs: an `{"$file": "<location>"}` value (`wfq enqueue --input
//! k=@path`) is read from the store, the worker's disk, S3 or the web,
//! checked against the manifest's type and the provider's limits, and
//! uploaded to the provider before the submit (`upload`): chenyu
//! `POST /assets`, Dify `POST /files/upload`, GPTBots by URL. Each upload is
//! a durable step recorded in `wfq.run_files`, reused by a retry, a crash or
//! a rescue, and by any run with the same bytes on the same profile.
//!
//! Outputs: with `[storage]`, the media outputs of succeeded runs are
//! copied to the store (`mirror`), streamed with a size limit and a
//! timeout, on a durable retry schedule of their own.
//!
//! Module map: `config` (`[storage]`), `location` (`$file` values),
//! `media` (content types), `storage` (the object store), `read` (input
//! files into a local copy), `mirror` (the output mirror service),
//! `upload` (input uploads before a submit).

pub mod cli;
pub mod config;
pub mod location;
pub mod media;
pub mod storage;

pub use config::{RawStorageConfig, StorageConfig, StorageUrl};
pub use location::{
    FileInput, FileLocation, SplitInputs, is_signed_url, redact_signed_urls,
    redact_signed_urls_in_text, split_inputs,
};
pub use storage::{Storage, StorageError, Stored, WriteError};
pub mod mirror;
pub mod upload;
