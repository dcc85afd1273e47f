from protos.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_UNSPECIFIED: _ClassVar[Event]
    EVENT_IMPRESSION: _ClassVar[Event]
    EVENT_CLICK: _ClassVar[Event]
    EVENT_ADD_TO_CART: _ClassVar[Event]
    EVENT_PURCHASE: _ClassVar[Event]
EVENT_UNSPECIFIED: Event
EVENT_IMPRESSION: Event
EVENT_CLICK: Event
EVENT_ADD_TO_CART: Event
EVENT_PURCHASE: Event

class Context(_message.Message):
    __slots__ = ("page", "device", "hour_of_day")
    PAGE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOUR_OF_DAY_FIELD_NUMBER: _ClassVar[int]
    page: str
    device: str
    hour_of_day: int
    def __init__(self, page: _Optional[str] = ..., device: _Optional[str] = ..., hour_of_day: _Optional[int] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "context", "k", "candidate_item_ids", "exclude_purchased", "departments")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_PURCHASED_FIELD_NUMBER: _ClassVar[int]
    DEPARTMENTS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    context: Context
    k: int
    candidate_item_ids: _containers.RepeatedScalarFieldContainer[str]
    exclude_purchased: bool
    departments: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., context: _Optional[_Union[Context, _Mapping]] = ..., k: _Optional[int] = ..., candidate_item_ids: _Optional[_Iterable[str]] = ..., exclude_purchased: _Optional[bool] = ..., departments: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "click_probability", "purchase_probability")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CLICK_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    PURCHASE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    click_probability: float
    purchase_probability: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., click_probability: _Optional[float] = ..., purchase_probability: _Optional[float] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("prediction_id", "items", "model", "fallback")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model: _common_pb2.ModelRef
    fallback: bool
    def __init__(self, prediction_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., fallback: _Optional[bool] = ...) -> None: ...

class RecommendationOutcome(_message.Message):
    __slots__ = ("prediction_id", "item_id", "event", "occurred_at")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    item_id: str
    event: Event
    occurred_at: float
    def __init__(self, prediction_id: _Optional[str] = ..., item_id: _Optional[str] = ..., event: _Optional[_Union[Event, str]] = ..., occurred_at: _Optional[float] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item_id", "title", "category", "price", "department")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    DEPARTMENT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    category: str
    price: float
    department: str
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., category: _Optional[str] = ..., price: _Optional[float] = ..., department: _Optional[str] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("inserted", "updated", "catalog_size")
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    CATALOG_SIZE_FIELD_NUMBER: _ClassVar[int]
    inserted: int
    updated: int
    catalog_size: int
    def __init__(self, inserted: _Optional[int] = ..., updated: _Optional[int] = ..., catalog_size: _Optional[int] = ...) -> None: ...
