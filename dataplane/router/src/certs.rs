//! Certificates behind the admin API (spec §1.2): validated keypairs deduplicated by
//! the SHA-256 of their certificate PEM, embedded in the routes that use them.

use std::collections::BTreeMap;
use std::sync::Arc;

use flynn_api::{ApiError, Certificate};
use rustls::sign::CertifiedKey;

use crate::tls::{parse_keypair, Keypair};

#[derive(Clone)]
struct Stored {
    seq: u64,
    api: Certificate,
    keypair: Keypair,
}

#[derive(Default, Clone)]
pub struct Certs {
    by_id: BTreeMap<String, Stored>,
    seq: u64,
}

fn now() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

impl Certs {
    /// Validates and stores a keypair; the same certificate again returns the stored one.
    pub fn add(&mut self, cert: &str, key: &str) -> Result<Certificate, ApiError> {
        let kp = parse_keypair(cert, key)
            .map_err(|e| ApiError::validation(None, &format!("Certificate invalid: {e}")))?;
        if let Some(s) = self.by_id.values().find(|s| s.keypair.sha256 == kp.sha256) {
            return Ok(s.api.clone());
        }
        let t = now();
        let api = Certificate {
            id: uuid::Uuid::new_v4().to_string(),
            routes: Vec::new(),
            cert: cert.trim().to_string(),
            key: key.trim().to_string(),
            created_at: Some(t.clone()),
            updated_at: Some(t),
        };
        self.seq += 1;
        self.by_id.insert(
            api.id.clone(),
            Stored {
                seq: self.seq,
                api: api.clone(),
                keypair: kp,
            },
        );
        Ok(api)
    }

    /// Takes a certificate handed over by the process this one replaces, keeping its id
    /// and creation time (clients hold on to ids). One already stored (same SHA-256)
    /// stays as it is.
    pub fn restore(&mut self, c: Certificate) -> Result<(), ApiError> {
        let kp = parse_keypair(&c.cert, &c.key)
            .map_err(|e| ApiError::validation(None, &format!("Certificate invalid: {e}")))?;
        if c.id.is_empty() || self.by_id.values().any(|s| s.keypair.sha256 == kp.sha256) {
            return Ok(());
        }
        let api = Certificate {
            routes: Vec::new(),
            cert: c.cert.trim().to_string(),
            key: c.key.trim().to_string(),
            ..c
        };
        self.seq += 1;
        self.by_id.insert(
            api.id.clone(),
            Stored {
                seq: self.seq,
                api,
                keypair: kp,
            },
        );
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&Certificate> {
        self.by_id.get(id).map(|s| &s.api)
    }

    /// Newest first.
    pub fn list(&self) -> Vec<Certificate> {
        let mut v: Vec<&Stored> = self.by_id.values().collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.seq));
        v.into_iter().map(|s| s.api.clone()).collect()
    }

    pub fn remove(&mut self, id: &str) -> Option<Certificate> {
        self.by_id.remove(id).map(|s| s.api)
    }

    pub fn key(&self, id: &str) -> Option<Arc<CertifiedKey>> {
        self.by_id.get(id).map(|s| s.keypair.key.clone())
    }
}
