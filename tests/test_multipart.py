"""The audio relay's multipart reader (`proxy/dialects/multipart.py`) against forms made by
httpx (as the OpenAI SDK sends them) and against any bytes: every field found with its
exact value, the model replaced and nothing else touched, and only a 400 for what is not a
form."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.dialects.multipart import parse_form
from proxy.domain.errors import GatewayError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# httpx percent-encodes quotes and control characters in a name: names a form may carry as they are.
names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"), exclude_characters='"\\%'), min_size=1, max_size=12,
)
values = st.binary(max_size=200) | st.sampled_from([b"\r\n--", b"--\r\n\r\n", b"\r\n\r\n", b""])


def httpx_form(fields: dict[str, str], files: dict[str, bytes]) -> tuple[str, bytes]:
    request = httpx.Request(
        "POST", "http://x/", data=fields, files={name: (f"{name}.wav", value, "audio/wav") for name, value in files.items()},
    )
    return request.headers["content-type"], request.read()


@FUZZ
@given(
    fields=st.dictionaries(names, st.text(max_size=40), max_size=4),
    files=st.dictionaries(names, values, min_size=1, max_size=2),
    model=st.text(min_size=1, max_size=30),
)
def test_every_field_is_found_and_only_the_model_is_replaced(
    fields: dict[str, str], files: dict[str, bytes], model: str,
) -> None:
    fields = {name: value for name, value in fields.items() if name not in files and name != "model"}
    content_type, body = httpx_form({**fields, "model": "whisper"}, files)
    form = parse_form(content_type, body)
    assert form.repeated == set()
    for name, value in fields.items():
        assert form.text(name) == value
    for name, value in files.items():
        part = form.part(name)
        assert part is not None and part.is_file and body[part.start : part.end] == value
    relayed = form.with_value("model", model)
    again = parse_form(content_type, relayed)
    assert again.text("model") == model
    for name, value in files.items():
        part = again.part(name)
        assert part is not None and relayed[part.start : part.end] == value
    assert relayed.replace(b'name="model"\r\n\r\n' + model.encode(), b'name="model"\r\n\r\nwhisper') == body


@FUZZ
@given(body=st.binary(max_size=300), boundary=st.sampled_from(["b", "xyz", '"q q"']))
def test_any_bytes_are_a_form_or_a_400(body: bytes, boundary: str) -> None:
    for candidate in (body, b"--b\r\n" + body, b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n" + body):
        try:
            parse_form(f"multipart/form-data; boundary={boundary}", candidate)
        except GatewayError as error:
            assert error.status == 400


@pytest.mark.parametrize("content_type", [None, "application/json", "multipart/form-data", "multipart/mixed; boundary=b"])
def test_what_is_not_a_form_with_a_boundary_is_a_400_naming_the_file(content_type: str | None) -> None:
    with pytest.raises(GatewayError) as refused:
        parse_form(content_type, b"--b\r\n\r\n--b--\r\n")
    assert refused.value.status == 400 and refused.value.param == "file"


def test_a_windows_path_as_file_name_is_a_file() -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="C:\\\\x\\\\a;b.wav"\r\n\r\nRIFF\r\n--b--\r\n'
    part = parse_form("multipart/form-data; boundary=b", body).part("file")
    assert part is not None and part.is_file and body[part.start : part.end] == b"RIFF"
