use std::sync::Arc;

use mesh_core::ConfigStore;
use tower::Layer;

use super::Route;

/// Routes requests by the route configuration of one listener (see the [module](super)).
#[derive(Clone, Debug)]
pub struct RouteLayer {
    store: ConfigStore,
    listener: Arc<str>,
}

impl RouteLayer {
    /// Routes by the listener `listener` (the target name, e.g. `greeter:50051`) as held in
    /// `store`.
    pub fn new(store: ConfigStore, listener: impl Into<Arc<str>>) -> Self {
        Self {
            store,
            listener: listener.into(),
        }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;

    fn layer(&self, inner: S) -> Route<S> {
        Route::new(inner, self.store.clone(), self.listener.clone())
    }
}
