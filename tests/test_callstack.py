"""dropbp.callstack: finding the ``self`` of a method further up the stack (the DeepSpeed engine, the Trainer)."""

from dropbp.callstack import calling_instance


class Engine:
    def forward(self, inner):
        return inner()

    def other(self, inner):
        return inner()


class SubEngine(Engine):
    pass


def nested(depth: int, inner):
    return inner() if depth == 0 else nested(depth - 1, inner)


def test_the_nearest_instance_on_the_stack_is_found():
    engine = Engine()
    assert engine.forward(lambda: calling_instance(Engine, 10)) is engine
    outer, inner = Engine(), Engine()
    assert outer.forward(lambda: inner.forward(lambda: calling_instance(Engine, 10))) is inner


def test_subclasses_match_and_other_classes_do_not():
    sub = SubEngine()
    assert sub.forward(lambda: calling_instance(Engine, 10)) is sub
    assert Engine().forward(lambda: calling_instance(SubEngine, 10)) is None


def test_the_depth_bounds_the_search():
    engine = Engine()
    assert engine.forward(lambda: nested(5, lambda: calling_instance(Engine, 10))) is engine
    assert engine.forward(lambda: nested(5, lambda: calling_instance(Engine, 3))) is None


def test_the_function_name_filters_frames():
    engine = Engine()
    assert engine.other(lambda: calling_instance(Engine, 10, function="forward")) is None
    assert engine.forward(lambda: calling_instance(Engine, 10, function="forward")) is engine


def test_nothing_on_the_stack():
    assert calling_instance(Engine, 50) is None
