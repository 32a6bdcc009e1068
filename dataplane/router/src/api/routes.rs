//! The `/routes` handlers: add, list, get, update and delete routes.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use flynn_api::{ApiError, Route, RouteType};
use serde::Deserialize;

use super::extract::{ApiBody, ApiErr, ApiPath, ApiQuery, Res};
use super::Api;
use crate::store::Store;

fn parse_kind(s: &str) -> Res<RouteType> {
    RouteType::parse(s)
        .ok_or_else(|| ApiErr(ApiError::validation(Some("type"), "Invalid route type")))
}

pub(super) async fn add_route(
    State(api): State<Arc<Api>>,
    ApiBody(body): ApiBody,
) -> Res<Json<Route>> {
    let r = Store::parse_route(&body)?;
    let (r, v, turn) = {
        let mut s = api.store_for_change()?;
        let r = s.add(r)?;
        (r, api.publish(&s), api.take_turn())
    };
    let set = r.clone();
    api.after_change(turn, v, move |api| api.emit("set", Some(set), None))
        .await;
    Ok(Json(r))
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    parent_ref: Option<String>,
}

pub(super) async fn list_routes(
    State(api): State<Arc<Api>>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Json<Vec<Route>> {
    Json(api.store().list(q.parent_ref.as_deref()))
}

pub(super) async fn get_route(
    State(api): State<Arc<Api>>,
    ApiPath((kind, id)): ApiPath<(String, String)>,
) -> Res<Json<Route>> {
    let kind = parse_kind(&kind)?;
    let s = api.store();
    s.get(kind, &id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiErr(ApiError::not_found("route not found")))
}

pub(super) async fn update_route(
    State(api): State<Arc<Api>>,
    ApiPath((kind, id)): ApiPath<(String, String)>,
    ApiBody(body): ApiBody,
) -> Res<Json<Route>> {
    let kind = parse_kind(&kind)?;
    let u = Store::parse_update(&body)?;
    let (r, v, turn) = {
        let mut s = api.store_for_change()?;
        let r = s.update(kind, &id, u)?;
        (r, api.publish(&s), api.take_turn())
    };
    let set = r.clone();
    api.after_change(turn, v, move |api| api.emit("set", Some(set), None))
        .await;
    Ok(Json(r))
}

pub(super) async fn delete_route(
    State(api): State<Arc<Api>>,
    ApiPath((kind, id)): ApiPath<(String, String)>,
) -> Res<StatusCode> {
    let kind = parse_kind(&kind)?;
    let (r, v, turn) = {
        let mut s = api.store_for_change()?;
        let r = s.remove(kind, &id)?;
        (r, api.publish(&s), api.take_turn())
    };
    api.after_change(turn, v, move |api| api.emit("remove", Some(r), None))
        .await;
    Ok(StatusCode::OK)
}
