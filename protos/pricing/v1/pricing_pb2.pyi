from protos.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Objective(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECTIVE_UNSPECIFIED: _ClassVar[Objective]
    OBJECTIVE_REVENUE: _ClassVar[Objective]
    OBJECTIVE_MARGIN: _ClassVar[Objective]
OBJECTIVE_UNSPECIFIED: Objective
OBJECTIVE_REVENUE: Objective
OBJECTIVE_MARGIN: Objective

class Guardrails(_message.Message):
    __slots__ = ("min_price", "max_price", "max_change_pct")
    MIN_PRICE_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHANGE_PCT_FIELD_NUMBER: _ClassVar[int]
    min_price: float
    max_price: float
    max_change_pct: float
    def __init__(self, min_price: _Optional[float] = ..., max_price: _Optional[float] = ..., max_change_pct: _Optional[float] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("segment", "hour_of_day")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    HOUR_OF_DAY_FIELD_NUMBER: _ClassVar[int]
    segment: str
    hour_of_day: int
    def __init__(self, segment: _Optional[str] = ..., hour_of_day: _Optional[int] = ...) -> None: ...

class QuoteRequest(_message.Message):
    __slots__ = ("product_id", "reference_price", "unit_cost", "guardrails", "objective", "context")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_PRICE_FIELD_NUMBER: _ClassVar[int]
    UNIT_COST_FIELD_NUMBER: _ClassVar[int]
    GUARDRAILS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    reference_price: float
    unit_cost: float
    guardrails: Guardrails
    objective: Objective
    context: Context
    def __init__(self, product_id: _Optional[str] = ..., reference_price: _Optional[float] = ..., unit_cost: _Optional[float] = ..., guardrails: _Optional[_Union[Guardrails, _Mapping]] = ..., objective: _Optional[_Union[Objective, str]] = ..., context: _Optional[_Union[Context, _Mapping]] = ...) -> None: ...

class QuoteResponse(_message.Message):
    __slots__ = ("prediction_id", "price", "expected_conversion", "expected_value", "exploratory", "model", "effective_min_price", "effective_max_price")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CONVERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPLORATORY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_MIN_PRICE_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_MAX_PRICE_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    price: float
    expected_conversion: float
    expected_value: float
    exploratory: bool
    model: _common_pb2.ModelRef
    effective_min_price: float
    effective_max_price: float
    def __init__(self, prediction_id: _Optional[str] = ..., price: _Optional[float] = ..., expected_conversion: _Optional[float] = ..., expected_value: _Optional[float] = ..., exploratory: _Optional[bool] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., effective_min_price: _Optional[float] = ..., effective_max_price: _Optional[float] = ...) -> None: ...

class PricingOutcome(_message.Message):
    __slots__ = ("prediction_id", "sold", "units", "price", "occurred_at")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    SOLD_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    sold: bool
    units: int
    price: float
    occurred_at: float
    def __init__(self, prediction_id: _Optional[str] = ..., sold: _Optional[bool] = ..., units: _Optional[int] = ..., price: _Optional[float] = ..., occurred_at: _Optional[float] = ...) -> None: ...
