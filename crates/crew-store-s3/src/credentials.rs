//! The bridge from aws-config's credential chain to `object_store`.
//!
//! Why a bridge: `object_store`'s own AWS credential code knows environment
//! variables, web identity and the instance/container metadata, but not the
//! shared config files with profiles, SSO, `credential_process` or
//! role assumption from a profile; aws-config knows all of it, the way the
//! AWS CLI does. aws-config's provider does not cache on its own (the SDK
//! clients cache in their identity cache, which `object_store` does not
//! use), so this type caches the credentials it got until shortly before
//! they expire, and lets one caller at a time refresh them.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use object_store::CredentialProvider;
use object_store::aws::AwsCredential;

/// Credentials are refreshed this long before they expire, so that a
/// request (with its retries, bounded well below this) never carries
/// credentials that expire while it runs.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// An `object_store` [`CredentialProvider`] over an aws-config provider
/// chain, caching until expiry. `Debug` shows no credential.
pub(crate) struct ChainCredentials {
    chain: SharedCredentialsProvider,
    /// The credential and when it must be refreshed (`None`: never, e.g.
    /// static keys from the environment).
    cached: tokio::sync::Mutex<Option<(Arc<AwsCredential>, Option<SystemTime>)>>,
}

impl fmt::Debug for ChainCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainCredentials").finish_non_exhaustive()
    }
}

impl ChainCredentials {
    pub(crate) fn new(chain: SharedCredentialsProvider) -> Self {
        Self { chain, cached: tokio::sync::Mutex::new(None) }
    }
}

#[async_trait]
impl CredentialProvider for ChainCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        // One refresh at a time: concurrent part uploads wait for it rather
        // than all asking the chain (an SSO or STS call) at once.
        let mut cached = self.cached.lock().await;
        if let Some((credential, refresh_at)) = cached.as_ref() {
            if refresh_at.is_none_or(|at| SystemTime::now() < at) {
                return Ok(Arc::clone(credential));
            }
        }
        let fresh = self.chain.provide_credentials().await.map_err(|e| object_store::Error::Unauthenticated {
            path: String::new(),
            source: Box::new(NoCredentials(crate::error::chain_text(&e))),
        })?;
        let credential = Arc::new(AwsCredential {
            key_id: fresh.access_key_id().to_owned(),
            secret_key: fresh.secret_access_key().to_owned(),
            token: fresh.session_token().map(str::to_owned),
        });
        let refresh_at = fresh.expiry().map(|e| e.checked_sub(REFRESH_MARGIN).unwrap_or(e));
        tracing::debug!(
            session = credential.token.is_some(),
            expires = ?fresh.expiry(),
            "loaded AWS credentials from the chain"
        );
        *cached = Some((Arc::clone(&credential), refresh_at));
        Ok(credential)
    }
}

/// Why the chain gave no credentials, as text (the chain's own errors carry
/// no secret but may not be `Send + Sync + 'static` in every variant).
#[derive(Debug)]
pub(crate) struct NoCredentials(pub(crate) String);

impl fmt::Display for NoCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no AWS credentials: {}", self.0)
    }
}

impl std::error::Error for NoCredentials {}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aws_credential_types::Credentials;
    use aws_credential_types::provider::future;

    use super::*;

    /// Counts calls; hands out credentials that expire `ttl` from now.
    #[derive(Debug)]
    struct Counting {
        calls: Arc<AtomicUsize>,
        ttl: Option<Duration>,
    }

    impl ProvideCredentials for Counting {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let expiry = self.ttl.map(|ttl| SystemTime::now() + ttl);
            future::ProvideCredentials::ready(Ok(Credentials::new(
                format!("AKID{n}"),
                "secret",
                Some(format!("token{n}")),
                expiry,
                "test",
            )))
        }
    }

    #[tokio::test]
    async fn caches_until_shortly_before_expiry_and_keeps_the_session_token() {
        let calls = Arc::new(AtomicUsize::new(0));
        let long = ChainCredentials::new(SharedCredentialsProvider::new(Counting {
            calls: calls.clone(),
            ttl: Some(Duration::from_secs(3600)),
        }));
        let a = long.get_credential().await.unwrap();
        let b = long.get_credential().await.unwrap();
        assert_eq!((a.key_id.as_str(), a.token.as_deref()), ("AKID0", Some("token0")));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(!format!("{long:?}").contains("secret"));

        // Credentials inside the refresh margin are fetched again each time.
        let calls = Arc::new(AtomicUsize::new(0));
        let short = ChainCredentials::new(SharedCredentialsProvider::new(Counting {
            calls: calls.clone(),
            ttl: Some(Duration::from_secs(60)),
        }));
        short.get_credential().await.unwrap();
        let again = short.get_credential().await.unwrap();
        assert_eq!(again.key_id, "AKID1");

        // Without an expiry (static keys) they are kept.
        let calls = Arc::new(AtomicUsize::new(0));
        let fixed = ChainCredentials::new(SharedCredentialsProvider::new(Counting { calls: calls.clone(), ttl: None }));
        fixed.get_credential().await.unwrap();
        fixed.get_credential().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
