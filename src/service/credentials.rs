//! `tether.v1.CredentialService`: create, list and delete credentials. No
//! response, error or log line here carries a secret. Callers see and delete
//! only credentials of owners in their scope.

use super::auth;
use super::convert::{credential_to_pb, struct_to_json};
use super::paging::{self, PageSizes, Query};
use crate::connection::{check_len, limits};
use crate::credentials::{Credentials, NewCredential};
use crate::error::Error;
use crate::pb::tether::v1 as pb;
use tonic::{Request, Response, Status};

pub(crate) struct CredentialService {
    credentials: Credentials,
    page_sizes: PageSizes,
}

impl CredentialService {
    pub(crate) fn new(
        credentials: Credentials,
        default_page_size: usize,
        max_page_size: usize,
    ) -> Self {
        CredentialService {
            credentials,
            page_sizes: PageSizes {
                default: default_page_size,
                max: max_page_size,
            },
        }
    }
}

#[tonic::async_trait]
impl pb::credential_service_server::CredentialService for CredentialService {
    async fn create_credential(
        &self,
        request: Request<pb::CreateCredentialRequest>,
    ) -> Result<Response<pb::Credential>, Status> {
        let principal = auth::principal(&request)?;
        let r = request.into_inner();
        check_len("owner", &r.owner, limits::SHORT)?;
        let owner = principal.owner_for(&r.owner, "owner")?;
        let secret = struct_to_json("secret", r.secret)?;
        let info = self
            .credentials
            .create(NewCredential {
                name: r.name,
                type_: r.r#type,
                secret,
                owner,
                allowed_hosts: r.allowed_hosts,
            })
            .await?;
        tracing::info!(id = %info.id, kind = %info.type_, principal = %principal.name, "credential created");
        Ok(Response::new(credential_to_pb(&info)))
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let r = request.into_inner();
        let limit = self.page_sizes.page_size(r.page_size)?;
        let query = Query::credentials(principal.scope.owners().as_deref());
        let after = paging::decode_created(&r.page_token, query)?;
        let (credentials, next) = self
            .credentials
            .list(after, limit, &principal.scope)
            .await?;
        Ok(Response::new(pb::ListCredentialsResponse {
            credentials: credentials.iter().map(credential_to_pb).collect(),
            next_page_token: next
                .as_ref()
                .map(|n| paging::encode_created(n, query))
                .unwrap_or_default(),
        }))
    }

    async fn delete_credential(
        &self,
        request: Request<pb::DeleteCredentialRequest>,
    ) -> Result<Response<pb::DeleteCredentialResponse>, Status> {
        let principal = auth::principal(&request)?;
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Error::invalid("id", "is required").into());
        }
        self.credentials
            .delete(id.clone(), &principal.scope)
            .await?;
        tracing::info!(%id, principal = %principal.name, "credential deleted");
        Ok(Response::new(pb::DeleteCredentialResponse {}))
    }
}
