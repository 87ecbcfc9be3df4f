//! TLS setup shared by the server backends.

/// Makes ring rustls's process-wide crypto provider unless the application chose one.
///
/// rustls panics on first use when it cannot tell which provider to use (none enabled,
/// or several enabled by different crates in the application), so every TLS path calls
/// this before connecting. Installing twice is harmless: the first provider stays.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
