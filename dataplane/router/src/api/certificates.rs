//! The `/certificates` handlers: add, list, get and delete certificates, and the routes
//! that use one.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use flynn_api::{ApiError, Certificate, Route};
use serde::Deserialize;

use super::extract::{ApiBody, ApiErr, ApiPath, Res};
use super::Api;

#[derive(Deserialize)]
struct CertBody {
    #[serde(default)]
    cert: String,
    #[serde(default)]
    key: String,
}

pub(super) async fn add_certificate(
    State(api): State<Arc<Api>>,
    ApiBody(body): ApiBody,
) -> Res<Json<Certificate>> {
    let b: CertBody = serde_json::from_slice(&body).map_err(|_| ApiError::syntax())?;
    let mut s = api.store_for_change()?;
    let c = s.certs.add(&b.cert, &b.key)?;
    Ok(Json(s.certificate(&c.id).unwrap_or(c)))
}

pub(super) async fn list_certificates(State(api): State<Arc<Api>>) -> Json<Vec<Certificate>> {
    let s = api.store();
    let ids: Vec<String> = s.certs.list().into_iter().map(|c| c.id).collect();
    Json(ids.iter().filter_map(|id| s.certificate(id)).collect())
}

fn cert_not_found() -> ApiErr {
    ApiErr(ApiError::object_not_found("certificate not found"))
}

pub(super) async fn get_certificate(
    State(api): State<Arc<Api>>,
    ApiPath(id): ApiPath<String>,
) -> Res<Json<Certificate>> {
    api.store()
        .certificate(&id)
        .map(Json)
        .ok_or_else(cert_not_found)
}

pub(super) async fn certificate_routes(
    State(api): State<Arc<Api>>,
    ApiPath(id): ApiPath<String>,
) -> Res<Json<Vec<Route>>> {
    let s = api.store();
    s.certs.get(&id).ok_or_else(cert_not_found)?;
    Ok(Json(s.certificate_routes(&id)))
}

pub(super) async fn delete_certificate(
    State(api): State<Arc<Api>>,
    ApiPath(id): ApiPath<String>,
) -> Res<StatusCode> {
    let mut s = api.store_for_change()?;
    s.certs.get(&id).ok_or_else(cert_not_found)?;
    if !s.certificate_routes(&id).is_empty() {
        return Err(ApiErr(ApiError::conflict(
            "certificate is in use by routes",
        )));
    }
    s.certs.remove(&id);
    Ok(StatusCode::OK)
}
