import Testing
@testable import SandpiperImages
