//! The storage API (spec §5.3) on the job API's port: host volumes of the `default`
//! provider. Snapshots (`PUT /storage/volumes/:id/snapshot`, `pull_snapshot`, `send`) are
//! not provided.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use flynn_api::host::{Volume, VolumeCreate};
use flynn_api::ApiError;

use crate::api::{body, json_body, path, Result};
use crate::host::Host;
use crate::logship::now_rfc3339;
use crate::volumes::{self, VolumeError};

pub fn router() -> Router<Arc<Host>> {
    Router::new()
        .route("/storage/providers", post(create_provider))
        .route("/storage/providers/{provider}/volumes", post(create_volume))
        .route("/storage/volumes", get(list_volumes))
        .route(
            "/storage/volumes/{id}",
            get(get_volume).delete(delete_volume),
        )
}

/// Only the built-in `default` provider (a directory per volume) exists.
async fn create_provider() -> Result<Json<serde_json::Value>> {
    Err(ApiError::validation(None, "only the default provider is supported").into())
}

async fn create_volume(
    State(host): State<Arc<Host>>,
    provider: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    b: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<Volume>> {
    let (provider, b) = (path(provider)?, body(b)?);
    if provider != volumes::DEFAULT_PROVIDER {
        return Err(ApiError::object_not_found(format!(
            "volume provider {provider:?} not found (only \"default\")"
        ))
        .into());
    }
    let req: VolumeCreate = if b.iter().all(u8::is_ascii_whitespace) {
        VolumeCreate::default()
    } else {
        json_body(&headers, &b)?
    };
    volumes::validate_create(&req)?;
    let vols = host.volumes().clone();
    let now = now_rfc3339();
    let res = tokio::task::spawn_blocking(move || vols.create(req, now))
        .await
        .map_err(|_| ApiError::unknown())?;
    match res {
        Ok(v) => {
            tracing::info!(volume = %v.id, "volume created");
            Ok(Json(v))
        }
        Err(VolumeError::Exists { id }) => Err(ApiError::new(
            flynn_api::ErrorCode::ObjectExists,
            format!("volume {id} already exists"),
        )
        .into()),
        Err(e) => {
            tracing::error!(error = ?e, "creating a volume failed");
            Err(ApiError::unknown().into())
        }
    }
}

async fn list_volumes(State(host): State<Arc<Host>>) -> Json<Vec<Volume>> {
    Json(host.volumes().list())
}

async fn get_volume(
    State(host): State<Arc<Host>>,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Volume>> {
    let id = path(id)?;
    host.volumes()
        .get(&id)
        .map(Json)
        .ok_or_else(|| ApiError::object_not_found("volume not found").into())
}

async fn delete_volume(
    State(host): State<Arc<Host>>,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>> {
    let id = path(id)?;
    host.delete_volume(&id).await?;
    tracing::info!(volume = %id, "volume deleted");
    Ok(Json(serde_json::json!({})))
}
