//! A per-process cache of workflow manifests, so a burst of runs of one
//! workflow costs one `market/info` call, not one per run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::MeteredClient;
use crate::providers::{Manifest, ManifestError};

/// What one fetch of a manifest gave, and when it finished.
#[derive(Debug)]
struct Fetched {
    at: Instant,
    result: Result<Option<Arc<Manifest>>, ManifestError>,
}

/// One workflow's entry. Its async lock is held while the manifest is
/// fetched, so runs that miss at once wait for that one fetch instead of
/// each making their own (measured: up to 51 `market/info` reads for one
/// workflow when 256 runs started on a cold cache).
type Slot = Arc<tokio::sync::Mutex<Option<Fetched>>>;

/// Manifests by (provider profile, workflow id), each kept for `ttl`.
#[derive(Debug, Default)]
pub struct ManifestCache {
    slots: Mutex<HashMap<(String, String), Slot>>,
}

impl ManifestCache {
    /// The cached manifest, or a fresh one from the provider. Runs that ask
    /// while a fetch is under way get that fetch's answer, a failure
    /// included (they would have asked at the same moment); only a
    /// manifest is kept for later runs.
    pub async fn get(
        &self,
        profile: &str,
        client: &MeteredClient,
        workflow_id: &str,
        ttl: Duration,
    ) -> Result<Option<Arc<Manifest>>, ManifestError> {
        let slot = self
            .lock()
            .entry((profile.to_owned(), workflow_id.to_owned()))
            .or_default()
            .clone();
        let asked = Instant::now();
        let mut fetched = slot.lock().await;
        if let Some(f) = fetched.as_ref() {
            if f.at >= asked {
                return f.result.clone();
            }
            if let Ok(Some(manifest)) = &f.result
                && f.at.elapsed() < ttl
            {
                return Ok(Some(manifest.clone()));
            }
        }
        let result = client
            .manifest(workflow_id)
            .await
            .map(|manifest| manifest.map(Arc::new));
        *fetched = Some(Fetched {
            at: Instant::now(),
            result: result.clone(),
        });
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Slot>> {
        // A panic while holding this lock cannot leave the map half-written
        // (every operation is a single entry lookup), so poison is harmless.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}
