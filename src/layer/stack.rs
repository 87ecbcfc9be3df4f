//! Building a stack whose order is decided at runtime.

use std::sync::Arc;

use crate::storage::StorageBackend;

/// A layer usable in a [`StackBuilder`]: anything that wraps an
/// `Arc<dyn StorageBackend>` into another backend. Every `tower::Layer` of this crate is
/// one.
pub trait DynLayer: Send + Sync {
    /// Wraps `inner`.
    fn layer_dyn(&self, inner: Arc<dyn StorageBackend>) -> Arc<dyn StorageBackend>;
}

impl<L> DynLayer for L
where
    L: tower_layer::Layer<Arc<dyn StorageBackend>> + Send + Sync,
    L::Service: StorageBackend + 'static,
{
    fn layer_dyn(&self, inner: Arc<dyn StorageBackend>) -> Arc<dyn StorageBackend> {
        Arc::new(self.layer(inner))
    }
}

/// Composes layers chosen at runtime (for example from a configuration list) into an
/// `Arc<dyn StorageBackend>`. As with `tower::ServiceBuilder`, the first layer added is
/// the outermost.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> aiecs_storage::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use aiecs_storage::layer::{RetryLayer, StackBuilder, TimeoutLayer};
/// use aiecs_storage::{prelude::*, MemoryBackend};
///
/// let names = ["retry", "timeout"]; // e.g. read from a config file
/// let mut stack = StackBuilder::new();
/// for name in names {
///     stack = match name {
///         "retry" => stack.layer(RetryLayer::new()),
///         _ => stack.layer(TimeoutLayer::new(Duration::from_secs(1))),
///     };
/// }
/// let storage = stack.build(Arc::new(MemoryBackend::new()));
/// storage.create_session("s1", "alice", &Default::default()).await?;
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct StackBuilder {
    layers: Vec<Box<dyn DynLayer>>,
}

impl std::fmt::Debug for StackBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackBuilder")
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl StackBuilder {
    /// An empty stack.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a layer inside the ones added before it.
    pub fn layer(mut self, layer: impl DynLayer + 'static) -> Self {
        self.layers.push(Box::new(layer));
        self
    }

    /// Adds a boxed layer inside the ones added before it.
    pub fn boxed_layer(mut self, layer: Box<dyn DynLayer>) -> Self {
        self.layers.push(layer);
        self
    }

    /// Wraps `backend` in every layer, the first added outermost.
    pub fn build(&self, backend: Arc<dyn StorageBackend>) -> Arc<dyn StorageBackend> {
        self.layers
            .iter()
            .rev()
            .fold(backend, |inner, layer| layer.layer_dyn(inner))
    }
}
