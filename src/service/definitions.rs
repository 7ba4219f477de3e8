//! `tether.v1.DefinitionService`: the connection definitions the server
//! knows, for UIs and CLIs. Definitions are few and fixed at start, so the
//! list is not paged.

use super::convert::definition_to_pb;
use crate::definitions::Registry;
use crate::error::Error;
use crate::pb::tether::v1 as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub(crate) struct DefinitionService {
    registry: Arc<Registry>,
}

impl DefinitionService {
    pub(crate) fn new(registry: Arc<Registry>) -> Self {
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
