"""The constructor arguments of the SN layers: the arity-dependent default
momentum, the checks BN does not make, and the signature shown to users."""
import inspect
import math
import numbers


class ArityDefault:
    """The default momentum, which depends on the arity (as in the authors'
    layers) while ``momentum=None`` stays the cumulative average (as in
    BN)."""

    def __repr__(self) -> str:
        return 'arity default (0.1 for 2d SN, 0.003 for 1d/3d and SSN)'


ARITY_DEFAULT = ArityDefault()


def check_arguments(num_features, eps, momentum, flags: dict) -> None:
    """Refuse what BN would silently accept (a string flag is truthy, a
    negative eps gives NaN), naming the argument."""
    if isinstance(num_features, bool) or not isinstance(
            num_features, numbers.Integral):
        raise TypeError(f'num_features must be a positive int, got '
                        f'{num_features!r} ({type(num_features).__name__})')
    if num_features <= 0:
        raise ValueError(
            f'num_features must be a positive int, got {num_features}')
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f'eps must be a positive float, got {eps!r} '
                        f'({type(eps).__name__})')
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f'eps must be a positive finite float, got {eps}')
    if momentum is not None:
        if isinstance(momentum, bool) or not isinstance(
                momentum, numbers.Real):
            raise TypeError(f'momentum must be a float in [0, 1] or None, '
                            f'got {momentum!r} ({type(momentum).__name__})')
        if not 0 <= momentum <= 1:
            raise ValueError(
                f'momentum must be in [0, 1] or None, got {momentum}')
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f'{name} must be True or False, got {value!r} '
                            f'({type(value).__name__})')


def public_signature(cls, base: type) -> inspect.Signature:
    """The signature ``help()`` and IDEs show for a concrete layer class:
    the arguments of ``base`` (the SN base class) with this class's default
    momentum, and the keyword arguments its own ``__init__`` adds
    (``process_group``)."""
    params = [
        p.replace(default=cls._default_momentum) if p.name == 'momentum'
        else p
        for p in list(inspect.signature(
            base.__init__).parameters.values())[1:]
    ]
    names = {p.name for p in params}
    for klass in cls.__mro__:
        init = vars(klass).get('__init__')
        if init is None or not issubclass(klass, base):
            continue  # torch's own keywords are not SN's to take
        for p in inspect.signature(init).parameters.values():
            if p.kind == p.KEYWORD_ONLY and p.name not in names:
                params.append(p)
                names.add(p.name)
    return inspect.Signature(params)
