//! A per-process cache of workflow manifests, so a burst of runs of one
//! workflow costs one `market/info` call, not one per run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::MeteredClient;
use crate::providers::{Manifest, ManifestError};

/// (provider profile, workflow id) -> (fetched at, manifest).
type Entries = HashMap<(String, String), (Instant, Arc<Manifest>)>;

/// Manifests by (provider profile, workflow id), each kept for `ttl`.
#[derive(Debug, Default)]
pub struct ManifestCache {
    entries: Mutex<Entries>,
}

impl ManifestCache {
    /// The cached manifest, or a fresh one from the provider.
    pub async fn get(
        &self,
        profile: &str,
        client: &MeteredClient,
        workflow_id: &str,
        ttl: Duration,
    ) -> Result<Option<Arc<Manifest>>, ManifestError> {
        let key = (profile.to_owned(), workflow_id.to_owned());
        if let Some((at, manifest)) = self.lock().get(&key)
            && at.elapsed() < ttl
        {
            return Ok(Some(manifest.clone()));
        }
        // Several runs may miss at once and each fetch; that is cheaper and
        // simpler than making them wait on one another.
        let Some(manifest) = client.manifest(workflow_id).await? else {
            return Ok(None);
        };
        let manifest = Arc::new(manifest);
        self.lock().insert(key, (Instant::now(), manifest.clone()));
        Ok(Some(manifest))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding this lock cannot leave the map half-written
        // (every operation is a single insert or get), so poison is harmless.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}
