//! `tether.v1.DefinitionService`: the connection definitions the server
//! knows, for UIs and CLIs.

use super::{duration, json_to_struct};
use crate::definitions::{Definition, Registry};
use crate::error::Error;
use crate::pb::tether::v1 as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct DefinitionService {
    registry: Arc<Registry>,
}

impl DefinitionService {
    pub fn new(registry: Arc<Registry>) -> Self {
        DefinitionService { registry }
    }
}

#[tonic::async_trait]
impl pb::definition_service_server::DefinitionService for DefinitionService {
    async fn list_definitions(
        &self,
        request: Request<pb::ListDefinitionsRequest>,
    ) -> Result<Response<pb::ListDefinitionsResponse>, Status> {
        let r = request.into_inner();
        let model = (!r.model.is_empty()).then_some(r.model.as_str());
        let kind = (!r.kind.is_empty()).then_some(r.kind.as_str());
        let definitions = self
            .registry
            .list(model, kind)
            .into_iter()
            .map(definition_to_pb)
            .collect();
        Ok(Response::new(pb::ListDefinitionsResponse { definitions }))
    }

    async fn get_definition(
        &self,
        request: Request<pb::GetDefinitionRequest>,
    ) -> Result<Response<pb::Definition>, Status> {
        let kind = &request.get_ref().kind;
        let d = self
            .registry
            .get(kind)
            .ok_or_else(|| Error::DefinitionNotFound { kind: kind.clone() })?;
        Ok(Response::new(definition_to_pb(d)))
    }
}

fn definition_to_pb(d: &Definition) -> pb::Definition {
    let (paths, service) = match &d.check {
        crate::probe::Check::Http { paths } => (paths.clone(), String::new()),
        crate::probe::Check::Grpc { service } => (Vec::new(), service.clone()),
        _ => (Vec::new(), String::new()),
    };
    let schema =
        |s: &Option<serde_json::Value>| s.as_ref().and_then(|v| v.as_object()).map(json_to_struct);
    pb::Definition {
        model: d.model.clone(),
        kind: d.kind.clone(),
        r#type: d.type_.clone(),
        sub_type: d.sub_type.clone(),
        display_name: d.display_name.clone(),
        description: d.description.clone(),
        managed: d.managed,
        auto_connect: d.auto_connect,
        check: Some(pb::Check {
            r#type: d.check.type_name().into(),
            paths,
            service,
        }),
        metadata_schema: schema(&d.metadata_schema),
        credential_schema: schema(&d.credential_schema),
        transitions: d
            .transitions
            .iter()
            .flatten()
            .map(|(state, targets)| pb::StateTargets {
                state: state.number(),
                targets: targets.iter().map(|t| t.number()).collect(),
            })
            .collect(),
        probe_interval: d.probe_interval.map(duration),
        extends: d.extends.clone().unwrap_or_default(),
    }
}
