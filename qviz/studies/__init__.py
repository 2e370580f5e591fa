"""Studies: the Lab's work, one module each (compare, tracing and isolation, evaluation, repairs,
memory). Each takes a Lab and returns result objects; the Lab only delegates to them."""
