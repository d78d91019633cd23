"""Serving's edges: uploads in flight count against the queued-job limit (and the refusal says
so); a generation queued on an expert whose job is then deleted answers the documented 410."""

import pytest
from fastapi.testclient import TestClient

from serving import create_app
from serving.limits import ApiError
from test_serving import apprentice_dir, settings_for  # noqa: F401 (the fixture)


def test_uploads_in_flight_count_against_the_queued_job_limit(tmp_path, apprentice_dir):
    with TestClient(create_app(settings_for(tmp_path, apprentice_dir, max_queued_jobs=3))) as c:
        rt = c.app.state.runtime
        for _ in range(3):  # three uploads being decoded, none queued yet
            rt.reserve_job()
        with pytest.raises(ApiError) as refused:
            rt.reserve_job()
        assert refused.value.status == 429
        assert "3 expert jobs are already queued or uploading (0 queued, 3 uploading; the limit is 3)" in str(refused.value)
        rt.unreserve_job()
        rt.reserve_job()


def test_a_generation_on_a_deleted_experts_files_answers_410(tmp_path, apprentice_dir):
    from serving.generation import GenerationService

    service = GenerationService(settings_for(tmp_path, apprentice_dir))
    folder = tmp_path / "experts" / "0123456789abcdef0123456789abcdef"
    work = service.expert_work(folder, "a {V} {class}", 1, 2, 5.0, 0)  # queued while the job existed
    with pytest.raises(ApiError) as gone:
        work(lambda: None)  # the job's files were deleted before it ran
    assert gone.value.status == 410 and "0123456789abcdef0123456789abcdef" in str(gone.value)
