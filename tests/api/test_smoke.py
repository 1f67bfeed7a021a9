from litestar import Litestar
from litestar.testing import TestClient

from tests.conftest import CALLER, Demo, headers, issue_token


def test_send_sms_answers_the_seed_success_text(client: TestClient[Litestar], demo: Demo) -> None:
    token = issue_token(client)
    response = client.post(
        f"/interact/version/3/account/{demo.tenant}/resources/campaign/sms/campaign1",
        headers=headers(),
        json={"callerId": CALLER, "jpToken": token},
    )
    assert response.status_code == 200
    assert response.text.startswith("Placed campaign {campaign1} in SMS queue messageSid: SM")
