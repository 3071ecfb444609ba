//! The gRPC face of the [`Coordinator`]: `JobService` (the CLI) and `ClusterService` (workers).
//! Each call is decoded (workers' requests checked into [`crate::request`] types by
//! [`convert`]) and handed to the coordinator's method of the same name.

use super::*;

/// The gRPC face of a [`Coordinator`] (both services).
#[derive(Clone)]
pub struct Api(pub Arc<Coordinator>);

impl std::ops::Deref for Api {
    type Target = Coordinator;
    fn deref(&self) -> &Coordinator {
        &self.0
    }
}

#[tonic::async_trait]
impl JobService for Api {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let req = request.into_inner();
        let job = Coordinator::submit(&self.0, &req.spec_yaml, &req.source_name).await?;
        Ok(Response::new(pb::SubmitJobResponse { job: Some(job) }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(self.get(&request.into_inner().job_id).await?))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(pb::ListJobsResponse {
            jobs: self.list().await,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(
            Coordinator::cancel(&self.0, &request.into_inner().job_id).await?,
        ))
    }

    type WatchJobStream = ReceiverStream<Result<pb::JobEvent, Status>>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Ok(Response::new(
            self.watch(&request.into_inner().job_id).await?,
        ))
    }
}

#[tonic::async_trait]
impl ClusterService for Api {
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let req = convert::registration_in(request.into_inner())?;
        let registered = self.register(req).await?;
        Ok(Response::new(convert::registered_out(registered)))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = convert::heartbeat_in(request.into_inner());
        let reply = Coordinator::heartbeat(&self.0, req).await?;
        Ok(Response::new(convert::heartbeat_out(reply)))
    }

    async fn report_task(
        &self,
        request: Request<pb::ReportTaskRequest>,
    ) -> Result<Response<pb::ReportTaskResponse>, Status> {
        self.report(convert::report_in(request.into_inner())?)
            .await?;
        Ok(Response::new(pb::ReportTaskResponse {}))
    }

    async fn rendezvous(
        &self,
        request: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousReply>, Status> {
        let req = convert::rendezvous_in(request.into_inner())?;
        let unique_id = Coordinator::rendezvous(&self.0, req).await?;
        Ok(Response::new(pb::RendezvousReply { unique_id }))
    }
}
