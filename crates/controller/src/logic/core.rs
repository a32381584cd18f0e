//! What every service shares: the state store, the settings, metrics and notifications, and the
//! controller's lifetime (the shutdown signal and the tasks a stopping controller waits for).

use std::ops::Deref;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Error, Result, Settings};
use crate::store::Store;

/// The shared part of every service. Cheap to clone.
#[derive(Clone)]
pub struct Core(Arc<CoreState>);

pub struct CoreState {
    pub(crate) store: Store,
    pub(crate) settings: Settings,
    pub(crate) metrics: crate::metrics::Metrics,
    pub(crate) notifier: crate::notify::Notifier,
    /// Cancelled when the controller shuts down: background tasks stop with it.
    pub(crate) shutdown: CancellationToken,
    /// Session tasks, which hold the services (and so the store): a stopping controller waits
    /// for them, so the next one can open the store.
    pub(crate) tasks: TaskTracker,
}

impl Deref for Core {
    type Target = CoreState;

    fn deref(&self) -> &CoreState {
        &self.0
    }
}

impl Core {
    pub(crate) fn new(store: Store, settings: Settings) -> Self {
        let notifier = crate::notify::Notifier::new(settings.notify_urls.clone());
        Self(Arc::new(CoreState {
            store,
            settings,
            metrics: Default::default(),
            notifier,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }))
    }

    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.0.metrics
    }

    pub(crate) fn notify(&self, kind: &str, event: serde_json::Value) {
        self.0.notifier.send(kind, event);
    }
}

/// Runs blocking work (the store, files) for a service off the async threads.
pub(crate) async fn blocking<S, T>(service: &S, f: impl FnOnce(&S) -> Result<T> + Send + 'static) -> Result<T>
where
    S: Clone + Send + 'static,
    T: Send + 'static,
{
    let this = service.clone();
    tokio::task::spawn_blocking(move || f(&this))
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

/// Gives a service `blocking(|s| …)`: [`blocking`] with the service itself.
macro_rules! blocking_method {
    () => {
        /// Runs a blocking operation (the store, files) off the async threads.
        pub(crate) async fn blocking<T: Send + 'static>(
            &self,
            f: impl FnOnce(&Self) -> $crate::logic::Result<T> + Send + 'static,
        ) -> $crate::logic::Result<T> {
            $crate::logic::core::blocking(self, f).await
        }
    };
}
pub(crate) use blocking_method;
